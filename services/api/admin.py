"""Admin actions on the database, for `warlock api-key create` and `warlock agent-token`."""

from __future__ import annotations

from services.api import crud
from services.api.db import initialise, make_engine, sessionmaker
from services.api.settings import ApiSettings


async def create_api_key(settings: ApiSettings, name: str) -> str:
    """Create an API key named `name` (schema created if missing); return the key, shown once."""
    engine = make_engine(settings.database_url)
    try:
        await initialise(engine, settings, bootstrap_key=False)
        async with sessionmaker(engine)() as session:
            return await crud.create_api_key(session, name)
    finally:
        await engine.dispose()


async def issue_agent_token(settings: ApiSettings, host: str) -> str:
    """Issue a new agent token for a registered host (by id or address); return it, shown once."""
    engine = make_engine(settings.database_url)
    try:
        await initialise(engine, settings, bootstrap_key=False)
        async with sessionmaker(engine)() as session:
            found = await crud.get_host(session, host)
            return await crud.issue_agent_token(session, found.id)
    finally:
        await engine.dispose()
