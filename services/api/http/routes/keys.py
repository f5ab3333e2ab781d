"""``/api/keys``: API keys — list, show, create (the key shown once), revoke. Admin only.

A key has a name (recorded as ``requested_by: api-key:NAME`` on what it runs), a role (read, operate,
admin), an optional label scope (read and operate keys only) and an optional expiry. Only the SHA-256 of
a key is stored. Revoking keeps the row (and its name: a name always means one key); the key is refused
at once on this API instance and within ``auth_cache_ttl`` seconds on the others.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, computed_field, model_validator

from services.api.http.auth import ADMIN
from services.api.http.deps import SessionDep, app_state
from services.api.store import crud
from services.api.store.models import KEY_NAME_PATTERN, ApiKey, KeyRole, LabelKey, LabelValue, utcnow

router = APIRouter(prefix="/keys", tags=["keys"])

MAX_SCOPE_LABELS = 16
MAX_EXPIRES_IN = 10 * 366 * 24 * 3600  # ten years, in seconds
KeyName = Annotated[str, StringConstraints(pattern=KEY_NAME_PATTERN)]
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "no key of this name"}}


class ApiKeyPublic(BaseModel):
    """An API key as listed (never the key itself)."""

    name: str
    role: KeyRole
    scope: dict[str, str] | None = Field(description="labels a host must carry; null: every host")
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None = Field(description="last request, to within a minute")

    @computed_field  # type: ignore[prop-decorator]
    @property
    def state(self) -> Literal["active", "expired", "revoked"]:
        """active, expired or revoked (revoked wins)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= utcnow():
            return "expired"
        return "active"


class ApiKeyCreated(ApiKeyPublic):
    """A new key: the fields above and the key itself, shown this once."""

    key: str = Field(description="the API key (64 hex); only its SHA-256 is stored: save it now")


class ApiKeyCreate(BaseModel):
    """Body of ``POST /api/keys``; unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    name: KeyName = Field(description="unique; 1-64 of A-Z a-z 0-9 _ . - starting alphanumeric")
    role: KeyRole = Field(description="read (GETs), operate (+ run commands), admin (+ hosts, agents, keys)")
    scope: dict[LabelKey, LabelValue] | None = Field(
        default=None,
        max_length=MAX_SCOPE_LABELS,
        description='labels, e.g. {"role": "web"}: the key sees and runs on only hosts carrying all of them',
    )
    expires_in: int | None = Field(default=None, ge=1, le=MAX_EXPIRES_IN, description="seconds from now")
    expires_at: datetime | None = Field(default=None, description="an absolute expiry (with a time zone)")

    @model_validator(mode="after")
    def _consistent(self) -> ApiKeyCreate:
        if self.scope is not None and not self.scope:
            raise ValueError("scope: give at least one label, or leave scope out for every host")
        if self.scope is not None and self.role == KeyRole.ADMIN:
            raise ValueError("scope: admin keys cannot be scoped (an admin can create keys); use operate")
        if self.expires_in is not None and self.expires_at is not None:
            raise ValueError("give expires_in or expires_at, not both")
        if self.expires_at is not None:
            if self.expires_at.tzinfo is None:
                raise ValueError("expires_at: give a time zone (e.g. 2030-01-01T00:00:00Z)")
            if self.expires_at <= utcnow():
                raise ValueError("expires_at is in the past")
        return self

    def expiry(self) -> datetime | None:
        """The absolute expiry, if any."""
        if self.expires_in is not None:
            return utcnow() + timedelta(seconds=self.expires_in)
        return self.expires_at.astimezone(UTC) if self.expires_at is not None else None


def _public(key: ApiKey) -> ApiKeyPublic:
    return ApiKeyPublic.model_validate(key, from_attributes=True)


@router.get("", response_model=list[ApiKeyPublic], dependencies=[ADMIN])
async def list_keys(session: SessionDep) -> list[ApiKeyPublic]:
    """Every API key, revoked and expired ones too, by name."""
    return [_public(k) for k in await crud.list_api_keys(session)]


@router.get("/{name}", response_model=ApiKeyPublic, responses=NOT_FOUND, dependencies=[ADMIN])
async def get_key(name: str, session: SessionDep) -> ApiKeyPublic:
    """One API key by name."""
    return _public(await crud.get_api_key(session, name))


@router.post(
    "",
    response_model=ApiKeyCreated,
    status_code=status.HTTP_201_CREATED,
    responses={409: {"description": "a key of this name exists (revoked ones too)"}},
    dependencies=[ADMIN],
)
async def create_key(body: ApiKeyCreate, session: SessionDep, response: Response) -> ApiKeyCreated:
    """Create a key; the answer carries it, once (only its SHA-256 is stored)."""
    key = await crud.create_api_key(
        session, body.name, role=body.role, scope=body.scope, expires_at=body.expiry()
    )
    row = await crud.get_api_key(session, body.name)
    response.headers["Location"] = f"/api/keys/{body.name}"
    return ApiKeyCreated(**_public(row).model_dump(exclude={"state"}), key=key)


@router.delete("/{name}", response_model=ApiKeyPublic, responses=NOT_FOUND, dependencies=[ADMIN])
async def revoke_key(name: str, request: Request, session: SessionDep) -> ApiKeyPublic:
    """Revoke a key: refused (401) from the next request on this API instance, and within
    ``auth_cache_ttl`` seconds on the others. Revoking again keeps the first time."""
    key = await crud.revoke_api_key(session, name)
    state = app_state(request)
    state.auth_cache.drop(key.name)
    state.limiter.forget(key.name)
    return _public(key)
