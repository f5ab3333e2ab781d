"""Domain errors carry no HTTP status; the http layer's table gives each the status it always answered."""

from __future__ import annotations

import json

import pytest

from services.api import errors
from services.api.fleet.wheel import WheelUnavailable
from services.api.http.errors import error_response, status_of

EXPECTED = {
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.SshCheckFailed: 422,
    errors.RemoteFailed: 502,
    errors.RemoteTimeout: 504,
    errors.Unauthorized: 401,
    errors.DependencyUnavailable: 503,
    errors.DatabaseUnavailable: 503,
    errors.WorkerUnavailable: 503,
    errors.NatsUnavailable: 503,
    WheelUnavailable: 503,
    errors.DomainError: 500,
}


@pytest.mark.parametrize(("cls", "status"), EXPECTED.items(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_each_domain_error_answers_its_status(cls: type[errors.DomainError], status: int) -> None:
    """The mapping, by class and by nearest ancestor; a domain error has no status of its own."""
    exc = cls("what went wrong", code="some_code", extra={"steps": []})
    assert not hasattr(exc, "status")
    assert status_of(exc) == status
    response = error_response(exc)
    assert response.status_code == status
    assert json.loads(bytes(response.body)) == {"detail": "what went wrong", "code": "some_code", "steps": []}


def test_every_domain_error_is_mapped() -> None:
    """No domain error class falls through to 500 by being forgotten."""
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.DomainError) and cls is not errors.DomainError:
            assert status_of(cls("x")) != 500, cls


def test_unauthorized_asks_for_a_bearer_key() -> None:
    """401 carries ``WWW-Authenticate: Bearer``; close=True adds ``Connection: close``."""
    response = error_response(errors.Unauthorized("missing API key"), close=True)
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["connection"] == "close"
