"""The Warlock agent: runs on each managed host, dials out to a gateway over WebSocket.

Modules: `config` (settings), `executor` (runs commands), `ledger` (run-at-most-once record),
`results` (trimming and un-acked results), `backoff` (reconnect policy), `dispatch` (sans-I/O frame
decisions), `metrics` (psutil samples), `client` (the connection loop), `swarm` (many simulated agents
for the benchmark), `cli` (the ``warlock-agent`` entrypoint).
"""

from shared.version import __version__

__all__ = ["__version__"]
