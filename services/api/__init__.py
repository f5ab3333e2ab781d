"""Warlock API service, in three layers (each imports only the ones below it; `lint-imports` checks):

    http/    the edge: routes, request dependencies, API key check, request/response schemas, the
             mapping of domain errors to HTTP statuses and JSON bodies
    fleet/   what the API does to the fleet over NATS: the hybrid runner, agent lifecycle, presence, the
             reconciler, command signing and verification
    store/   the database: engine, tables, queries, the exec path's run store, per-host locks

`errors` (domain errors, no HTTP status), `settings` and `main` (app factory and `warlock-api`) sit beside
the layers. The dev launcher lives in `services.dev`, the `warlock` CLI in `services.ctl`.
"""

from shared.version import __version__

__all__ = ["__version__"]
