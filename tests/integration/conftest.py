"""Fixtures shared by the integration tests (NATS server, stack and client: tests/conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.db import BACKENDS, fresh_database


@pytest.fixture(params=BACKENDS)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh database URL, once per backend (a new PostgreSQL database or SQLite file per test)."""
    async with fresh_database(request.param, tmp_path) as url:
        yield url
