"""``/api/jobs``: one command to many hosts (by list, labels or all), in batches; one outcome per host.

The body and answer models live here (not in `schemas`): only this resource uses them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import Field as PydanticField
from pydantic import StrictBool, StringConstraints, model_validator
from sqlmodel import Field, SQLModel
from sqlmodel._compat import SQLModelConfig

from services.api.errors import Forbidden, NotFound
from services.api.fleet.jobs import BadSelection, JobRunner, JobSpec
from services.api.http.auth import OPERATE, READ, check_hosts, scoped
from services.api.http.deps import api_key_name, app_state
from services.api.http.schemas import FiniteFloat
from services.api.store import jobs as store
from services.api.store.models import CommandStatus, Job, LabelKey, LabelValue, Via
from shared.protocol import DEFAULT_TIMEOUT_S, MAX_TIMEOUT_S, CommandText

router = APIRouter(prefix="/jobs", tags=["jobs"])

MAX_TARGET_REFS = 100_000
HostRef = Annotated[str, StringConstraints(min_length=1, max_length=253)]
BatchCount = Annotated[int, PydanticField(ge=1, strict=True)]
BatchPercent = Annotated[str, StringConstraints(pattern=r"^(100|[1-9][0-9]?)%$")]


# ----------------------------------------------------------------------------- label selectors


def parse_label_selectors(values: list[str], parameter: str = "label") -> list[tuple[str, str | None]]:
    """``k=v`` (the label equals) or ``k`` (the label is present) → (key, value or None); a malformed one
    raises RequestValidationError (422) naming the query parameter."""
    selectors: list[tuple[str, str | None]] = []
    for raw in values:
        key, eq, value = raw.partition("=")
        problem = None
        if not key:
            problem = "a label selector is key=value or key; the key is empty"
        elif len(key) > 63:
            problem = "label keys are at most 63 characters"
        elif len(value) > 255:
            problem = "label values are at most 255 characters"
        if problem is not None:
            raise RequestValidationError(
                [{"type": "value_error", "loc": ("query", parameter), "msg": problem, "input": raw}]
            )
        selectors.append((key, value if eq else None))
    return selectors


# ----------------------------------------------------------------------------- bodies and answers


class JobTargets(SQLModel):
    """Exactly one of: a host list (ids or addresses), labels (all must match), or every host."""

    model_config = SQLModelConfig(extra="forbid")

    hosts: list[HostRef] | None = Field(default=None, min_length=1, max_length=MAX_TARGET_REFS)
    labels: dict[LabelKey, LabelValue] | None = Field(default=None, min_length=1, max_length=64)
    all: Literal[True] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> JobTargets:
        given = [name for name in ("hosts", "labels", "all") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of hosts, labels, all (got {', '.join(given) or 'none'})")
        return self


class JobBody(SQLModel):
    """Body of ``POST /api/jobs``; unknown fields are refused (422)."""

    model_config = SQLModelConfig(extra="forbid")

    command: CommandText
    timeout: FiniteFloat = Field(default=DEFAULT_TIMEOUT_S, gt=0, le=MAX_TIMEOUT_S, description="seconds")
    targets: JobTargets
    batch: BatchCount | BatchPercent | None = Field(
        default=None, description="hosts in flight at once: N, or N% of the targets (at least 1); default all"
    )
    stop_on_failure: StrictBool = Field(
        default=False, description="after a batch with a failure, start no further batch (the rest: skipped)"
    )


class JobCounts(SQLModel):
    """Outcomes so far; `pending` counts runs queued or in flight."""

    succeeded: int = 0
    failed: int = 0
    timed_out: int = 0
    unreachable: int = 0
    cancelled: int = 0
    skipped: int = 0
    pending: int = 0


class JobOutcome(SQLModel):
    """One targeted host's run (its full record: ``GET /api/commands/{command_id}``)."""

    host_id: str
    command_id: str
    status: CommandStatus
    via: Via | None
    exit_code: int | None
    signal: int | None
    error_code: str | None
    error_description: str | None  # why: e.g. unreachable (no agent session, no SSH worker), skipped
    duration_ms: float | None
    created_at: datetime
    finished_at: datetime | None


class JobPublic(SQLModel):
    """A job, its counts and (on ``GET /api/jobs/{id}``) its per-host outcomes."""

    job_id: str
    state: str
    command: str
    timeout: float
    selection: dict[str, Any]
    targets: int
    batch: str | None
    batch_size: int
    stop_on_failure: bool
    requested_by: str | None
    created_at: datetime
    finished_at: datetime | None
    counts: JobCounts
    outcomes: list[JobOutcome] | None = None
    outcomes_offset: int | None = None


_COUNTED = {
    CommandStatus.SUCCEEDED.value: "succeeded",
    CommandStatus.FAILED.value: "failed",
    CommandStatus.TIMED_OUT.value: "timed_out",
    CommandStatus.UNDELIVERABLE.value: "unreachable",
    CommandStatus.CANCELLED.value: "cancelled",
    CommandStatus.SKIPPED.value: "skipped",
}


def counts_of(by_status: dict[str, int]) -> JobCounts:
    """The answer's counts from runs per status (any status not final counts as pending)."""
    counts = JobCounts()
    for run_status, n in by_status.items():
        name = _COUNTED.get(run_status, "pending")
        setattr(counts, name, getattr(counts, name) + n)
    return counts


def public(job: Job, by_status: dict[str, int]) -> JobPublic:
    """A job row as answered."""
    data = job.model_dump()
    data["state"] = str(job.state)
    return JobPublic.model_validate({**data, "counts": counts_of(by_status)})


def job_runner(request: Request) -> JobRunner:
    """The app's JobRunner."""
    runner: JobRunner = request.app.state.jobs
    return runner


# ----------------------------------------------------------------------------- routes


@router.post(
    "",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        422: {"description": "bad body; unknown hosts in the list (code unknown_hosts); no host selected"},
        403: {"description": "the selection reaches outside the key's scope (out_of_scope, hosts named)"},
        503: {"description": "database or NATS unavailable: nothing recorded or sent"},
    },
    dependencies=[OPERATE],
)
async def create_job(body: JobBody, request: Request, response: Response) -> JobPublic:
    """Run `command` on every selected host, `batch` at a time; answers at once (202, ``Location``)."""
    state = app_state(request)
    state.require_db()
    state.require_nats()
    t = body.targets
    spec = JobSpec(
        command=body.command,
        timeout=body.timeout,
        hosts=t.hosts,
        labels=None if t.labels is None else dict(t.labels),
        all_hosts=bool(t.all),
        batch=body.batch,
        stop_on_failure=body.stop_on_failure,
    )
    try:
        job, _ = await job_runner(request).submit(
            spec, f"api-key:{api_key_name(request)}", admit=lambda hosts: check_hosts(request, hosts)
        )
    except BadSelection as exc:
        field = "hosts" if t.hosts is not None else ("labels" if t.labels is not None else "all")
        error: dict[str, Any] = {
            "type": exc.code or "value_error",
            "loc": ("body", "targets", field),
            "msg": exc.detail,
            "input": exc.extra.get("unknown", getattr(t, field)),
        }
        raise RequestValidationError([error]) from exc
    response.headers["Location"] = f"/api/jobs/{job.job_id}"
    pending = {CommandStatus.PENDING.value: job.targets}
    return public(job, pending)


@router.get("", response_model=list[JobPublic], dependencies=[READ])
async def list_jobs(
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobPublic]:
    """Jobs, most recent first, with their counts (no per-host outcomes: ``GET /api/jobs/{id}``)."""
    state = app_state(request)
    state.require_db()
    jobs = await store.list_jobs(state.engine, limit, offset)
    if scoped(request) is not None:  # a scoped key sees the jobs it made (all within its scope)
        jobs = [j for j in jobs if j.requested_by == f"api-key:{api_key_name(request)}"]
    counts = await store.job_counts(state.engine, [j.job_id for j in jobs])
    return [public(j, counts[j.job_id]) for j in jobs]


@router.get(
    "/{job_id}",
    response_model=JobPublic,
    responses={404: {"description": "unknown job"}, 403: {"description": "outside the key's scope"}},
    dependencies=[READ],
)
async def get_job(
    job_id: str,
    request: Request,
    limit: Annotated[int, Query(ge=0, le=100_000, description="outcomes per page (0: counts only)")] = 10_000,
    offset: Annotated[int, Query(ge=0)] = 0,
    status_filter: Annotated[CommandStatus | None, Query(alias="status")] = None,
) -> JobPublic:
    """The job's state, counts and one outcome per targeted host (by host id; paged by limit/offset)."""
    state = app_state(request)
    state.require_db()
    job = await store.get_job(state.engine, job_id)
    if job is None:
        raise NotFound(f"unknown job {job_id[:100]!r}")
    check_job_scope(request, job)
    counts = await store.job_counts(state.engine, [job_id])
    answer = public(job, counts[job_id])
    if limit > 0:
        found = status_filter.value if status_filter is not None else None
        rows = await store.job_outcomes(state.engine, job_id, limit, offset, found)
        answer.outcomes = [JobOutcome.model_validate(r) for r in rows]
        answer.outcomes_offset = offset
    return answer


@router.post(
    "/{job_id}/cancel",
    response_model=JobPublic,
    responses={404: {"description": "unknown job"}, 403: {"description": "outside the key's scope"}},
    dependencies=[OPERATE],
)
async def cancel_job(job_id: str, request: Request) -> JobPublic:
    """Start no further batch; hosts not sent yet get ``cancelled`` (nothing ran). Runs already sent
    finish (their results are kept). Cancelling a finished job changes nothing."""
    state = app_state(request)
    state.require_db()
    found = await store.get_job(state.engine, job_id)
    if found is None:
        raise NotFound(f"unknown job {job_id[:100]!r}")
    check_job_scope(request, found)
    job = await job_runner(request).cancel(job_id)
    counts = await store.job_counts(state.engine, [job_id])
    return public(job, counts[job_id])


def check_job_scope(request: Request, job: Job) -> None:
    """A scoped key reaches only the jobs it made: it could only make them within its scope, while another
    key's job may reach outside it (403 ``out_of_scope``)."""
    if scoped(request) is not None and job.requested_by != f"api-key:{api_key_name(request)}":
        raise Forbidden(
            f"job {job.job_id} was made by another key and may reach outside this key's scope",
            code="out_of_scope",
        )
