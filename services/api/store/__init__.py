"""The API's storage layer: no HTTP, no NATS.

`db` (engine, schema initialisation, bootstrap key), `models` (SQLModel tables and their enums), `crud`
(one async function per query or change), `runstore` (the exec path's two writes in plain SQL),
`hostlock` (one lifecycle operation per host at a time, across API instances: an advisory lock on
PostgreSQL, so it belongs with the database).
"""
